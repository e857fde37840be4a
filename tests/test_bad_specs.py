"""A corpus of bad specs: each gives its expected error code at its expected place.

Syntax, names, types and scopes, constraints and domains, numerical safety, and refuted
laws: the first diagnostic of each spec is compared with (code, line, column), and every
diagnostic must render with a location, an excerpt or a hint.
"""
import pytest

import gradspec
from gradspec.check import diagnose

H = "optimizer t\nhyper lr = 0.1 >= 0\n"
U = "param' = param - lr * grad\n"
CASES = [
    # syntax
    ("stray_char", H + "x = grad $ 2\n" + U, "GS001", 3, 10),
    ("power_with_stars", H + "x = grad ** 2\n" + U, "GS002", 3, 10),
    ("unclosed_docstring", '"""Adam, but\n' + H + U, "GS001", 1, 1),
    ("unclosed_string", H + 'require lr > 0 "lr must be positive\n' + U, "GS001", 3, 16),
    # files: what is read, in which encoding
    ("latin1_text", (H + "# caf\u00e9\n" + U).encode("latin-1"), "GS006", 3, 6),
    ("binary_file", b"\x7fELF\x02\x01\x01\x00\x00\xff\x00\x00", "GS006", 1, 10),
    ("utf16_text", (H + U).encode("utf-16"), "GS006", 1, 1),
    ("missing_file", None, "GS005", None, None),
    ("import_system_file", 'import "/etc/passwd" as p\noptimizer x = p\n', "GS020", 1, 1),
    ("import_system_file_relative", 'import "../../../../../../../../etc/passwd" as p\noptimizer x = p\n',
     "GS020", 1, 1),
    ("import_device", 'import "/dev/zero" as z\noptimizer x = z\n', "GS020", 1, 1),
    ("import_folder", 'import "." as d\noptimizer x = d\n', "GS020", 1, 1),
    ("import_nul_path", 'import "a\0.opt" as n\noptimizer x = n\n', "GS020", 1, 1),
    ("import_missing", 'import "nowhere.opt" as n\noptimizer x = n\n', "GS020", 1, 1),
    ("self_import", 'import "self_import.opt" as me\noptimizer x = me\n', "GS032", 1, 1),
    ("import_cycle", 'import "cycle_partner.opt" as b\noptimizer a = b\n', "GS032", 1, 1),
    ("missing_brace", H + "if true {\n" + U, "GS002", 4, 23),
    ("reserved_name", H + "law = 1\n" + U, "GS002", 3, 5),
    ("bad_hyper_type", "optimizer t\nhyper k: float = 1\n" + U.replace("lr", "k"), "GS003", 2, 10),
    ("int_hyper_bool", "optimizer t\nhyper k: int = true\n" + U.replace("lr", "k"), "GS003", 2, 10),
    ("bad_state_scope", H + "state m: matrix = 0\nm' = m\n" + U, "GS004", 3, 10),
    ("law_missing_claim", H + "law \"a message alone\"\n" + U, "GS002", 3, 5),
    ("law_bad_mapping", H + "law invariant grad => 2 * grad\n" + U, "GS002", 3, 20),
    # names
    ("unknown_name", H + "param' = param - lrr * grad\n", "GS030", 3, 18),
    ("unknown_function", H + "x = sqr(grad)\nparam' = param - lr * x\n", "GS051", 3, 5),
    ("unscoped_reduction", H + "x = norm(grad)\nparam' = param - lr * x * grad\n", "GS051", 3, 5),
    ("unknown_reduction", H + "x = global.nrm(grad)\nparam' = param - lr * x * grad\n", "GS055", 3, 5),
    ("duplicate_hyper", H + "hyper lr = 0.2 >= 0\n" + U, "GS010", 3, 1),
    ("hyper_named_input", H + "hyper grad = 1\n" + U, "GS011", 3, 1),
    ("hyper_in_if", H + "if true {\nhyper x = 1\n}\n" + U, "GS012", 4, 1),
    ("law_in_if", H + "if true {\nlaw fixed_point\n}\n" + U, "GS012", 4, 1),
    ("unknown_spec_in_law", H + "law equals adm\n" + U, "GS021", 3, 12),
    ("variant_with_statements", "optimizer n = adam(beta2 = 0.99)\nx = 1\n", "GS017", 2, 1),
    ("state_without_next", H + "state m = 0\n" + U, "GS040", 3, 1),
    ("next_of_non_state", H + "m' = grad\n" + U, "GS041", 3, 1),
    ("no_update", H + "x = grad\n", "GS042", None, None),
    ("defined_twice", H + "x = grad\nx = 2 * grad\nparam' = param - lr * x\n", "GS044", 4, 1),
    ("circular", H + "state m = 0\nm' = m' + grad\n" + U, "GS048", 4, 1),
    ("law_sets_unknown_hyper", H + "law fixed_point at eps = 0\n" + U, "GS080", 3, 20),
    ("class_value_over_the_group", H + "if matrix {\n  t = global.sum(row.mean(grad))\n} else {\n  t = 0\n}\n"
     "param' = param - lr * grad * t\n", "GS069", 4, 7),
    ("too_many_shape_classes", H + "d0 = grad\n" + "".join(
        f"if matrix and cols <= {i} {{\n  d{i} = d{i - 1}\n}} else {{\n  d{i} = 2 * d{i - 1}\n}}\n" for i in range(1, 8))
     + "param' = param - lr * d7\n", "GS069", 34, 4),
    ("shape_condition_dividing_by_a_size", H + "if rows / cols > 1 {\n  d = 2 * grad\n} else {\n  d = grad\n}\n"
     "param' = param - lr * d\n", "GS047", 3, 4),
    ("require_no_value_meets_in_a_loop", H + "x = grad\nrepeat 2 {\n  require lr < 0 \"never\"\n  x' = x\n}\n"
     "param' = param - lr * x'\n", "GS071", 5, 3),
    ("element_shaped_state_in_a_block", H + "blocks 2 {\n  state L: (rows, cols) = 0\n  L' = L + grad\n  d = L'\n}\n"
     "param' = param - lr * d\n", "GS074", 4, 3),
    ("condition_undefined_at_the_defaults", H + "if 1 / (lr - 0.1) > 0 {\n  d = grad\n} else {\n  d = 2 * grad\n}\n"
     "param' = param - lr * d\n", "GS047", 3, 4),
    ("shape_condition_with_a_root", H + "if sqrt(rows) > 1 {\n  d = grad\n} else {\n  d = 2 * grad\n}\n"
     "param' = param - lr * d\n", "GS047", 3, 4),
    ("size_of_an_axis", H + "param' = param - lr * grad / row.numel\n", "GS055", 3, 30),
    ("qualified_outside_adaptor", H + "param' = param - lr * base.grad\n", "GS057", 3, 23),
    ("base_set_outside_adaptor", H + "base.param = 0\nparam' = param - lr * grad\n", "GS057", 3, 1),
    ("shape_condition_without_value", H + "hyper k: int = 3 >= 1\nif cols <= k / 0 {\n  d = grad\n} else {\n"
     "  d = 2 * grad\n}\nparam' = param - lr * d\n", "GS047", 4, 4),
    ("require_on_the_shape_class", H + "require matrix\n" + U, "GS047", 3, 9),
    ("number_too_long", H + "param' = param - lr * " + "1" * 5000 + " * grad\n", "GS001", 3, 23),
    ("adaptor_applied_twice", "optimizer x = lookahead(lookahead(adam))\n", "GS033", 1, 15),
    # types and scopes
    ("bool_arithmetic", H + "x = (grad > 0) + 1\nparam' = param - lr * x\n", "GS050", 3, 6),
    # found by test_mutations: a condition as a state's value crashed the range analysis
    ("bool_next_value", H + "state s = 0\ns' = grad > 0\n" + U, "GS050", 4, 1),
    ("bool_initial_value", H + "state s = 1 > 0\ns' = s\n" + U, "GS050", 3, 11),
    ("where_not_bool", H + "x = where(grad, 1, 0)\nparam' = param - lr * x\n", "GS053", 3, 11),
    ("arity", H + "x = max(grad)\nparam' = param - lr * x\n", "GS052", 3, 5),
    ("condition_on_tensor", H + "if grad > 0 {\nx = 1\n} else {\nx = 2\n}\nparam' = param - lr * x * grad\n", "GS047", 3, 4),
    ("reduce_a_scalar", H + "x = global.sum(lr)\nparam' = param - lr * x * grad\n", "GS056", 3, 16),
    ("init_uses_state", H + "state m = step\nm' = m\n" + U, "GS058", 3, 11),
    ("global_state_per_element", H + "state s: global = 0\ns' = grad\n" + U, "GS061", 4, 1),
    ("groups_reduction_nested", H + "x = groups.sum(grad / groups.norm(grad))\nparam' = param - lr * x * grad\n",
     "GS077", 3, 5),
    ("groups_reduction_in_initial_value", H + "state s = groups.sum(grad)\ns' = s\n" + U, "GS077", 3, 11),
    ("groups_reduction_in_repeat", H + "x = grad\nrepeat 2 {\n  x' = x / groups.norm(x)\n}\n"
     "param' = param - lr * x'\n", "GS077", 5, 12),
    ("groups_unknown_size", H + "param' = param - lr * grad / groups.rows\n", "GS055", 3, 30),
    # constraints and domains
    ("override_set_twice", "optimizer t = sgd(lr = 0.5, lr = 0.3)\n", "GS016", 1, 29),
    ("override_to_infinity", "optimizer t = sgd(lr = inf)\n", "GS016", 1, 19),
    ("constant_that_is_nan", H + "param' = param - lr * grad * (inf - inf)\n", "GS072", 3, 31),
    ("constant_that_overflows", H + "param' = param - lr * grad * 2^1024\n", "GS072", 3, 30),
    ("number_past_float64", H + "param' = param - lr * grad * 1e400\n", "GS001", 3, 30),
    ("default_breaks_constraint", "optimizer t\nhyper lr = -1 >= 0\n" + U, "GS014", 2, 1),
    ("int_default_past_64_bits", H + "hyper k: int = 1e30 >= 1\nif matrix and cols <= k {\n  d = grad\n} else {\n"
     "  d = 2 * grad\n}\nparam' = param - lr * d\n", "GS014", 3, 1),
    ("empty_interval", "optimizer t\nhyper lr = 0.1 >= 0\nhyper b = 0.5 in [1, 0]\n" + U, "GS070", 3, 1),
    ("empty_open_interval", "optimizer t\nhyper lr = 0.1 >= 0\nhyper b = 0 in (0, 0]\n" + U, "GS070", 3, 1),
    ("require_never_holds", H + "hyper b = 0.5 in [0, 1)\nrequire b > 2 \"b must exceed 2\"\n" + U, "GS071", 4, 1),
    # safety
    ("eps_may_be_zero", H + "hyper eps = 1e-8 >= 0\nstate v = 0\nv' = 0.9 * v + 0.1 * grad^2\nparam' = param - lr * grad / (sqrt(v') + eps)\n", "GS072", 6, 31),
    ("unconstrained_divisor", H + "hyper eps = 1e-8\nparam' = param - lr * grad / eps\n", "GS072", 4, 30),
    ("sqrt_of_signed_state", H + "state v = 0\nv' = 0.9 * v + 0.1 * grad\nparam' = param - lr * grad / (sqrt(v') + 1)\n", "GS072", 5, 36),
    ("log_of_grad", H + "param' = param - lr * log(grad)\n", "GS072", 3, 27),
    ("rsqrt_of_nonneg", H + "param' = param - lr * rsqrt(grad * grad)\n", "GS072", 3, 29),
    ("fractional_power_of_grad", H + "param' = param - lr * grad^0.5\n", "GS072", 3, 23),
    ("negative_power_of_zero", H + "hyper k = 0 >= 0\nparam' = param - lr * k^(-1) * grad\n", "GS072", 4, 23),
    ("mod_by_zero", "optimizer t\nhyper lr = 0.1 >= 0\nhyper k: int = 1 >= 0\nparam' = where(step % k == 0, param - lr * grad, param)\n", "GS072", 4, 23),
    ("divide_by_one_minus_beta", H + "hyper beta = 0.9 in [0, 1]\nparam' = param - lr * grad / (1 - beta)\n", "GS072", 4, 31),
    # probes
    ("grad_at_outside_probe", H + "param' = param - lr * grad_at(param)\n", "GS063", 3, 23),
    ("randn_in_the_step", H + "param' = param - lr * randn()\n", "GS063", 3, 23),
    # every k { } evaluates nothing (its steps need no closure); randn() is allowed there
    ("model_probe_in_every", H + "state s = 0\nevery 2 {\n  s' = grad_at(param + 0.01 * grad)\n}\n"
     "param' = param - lr * (grad + s')\n", "GS063", 5, 8),
    ("model_probe_in_a_shaped_step", H + "state h = 0\nprobe every 2 {\n  h' = hvp(grad)\n}\n"
     "param' = param - lr * grad / (1 + row.mean(abs(h')))\n", "GS069", 5, 8),
    ("product_sizes_differ", H + "param' = param - lr * transpose(grad) @ transpose(grad)\n", "GS067", 3, 18),
    ("state_shape_mismatch", H + "state L: (rows, rows) = 0\nL' = L + grad\n" + U, "GS067", 4, 6),
    ("bad_state_size", H + "state L: (rows, q) = 0\nL' = L\n" + U, "GS068", 3, 1),
    ("repeat_local_outside", H + "x = grad\nrepeat 2 {\n  y = x\n  x' = y\n}\nparam' = param - lr * y\n",
     "GS068", 8, 23),
    ("inverse_root_not_definite", H + "param' = param - lr * inv_root(grad @ transpose(grad), 4) @ grad\n",
     "GS073", 3, 32),
    ("inverse_root_power_may_be_zero", H + "hyper p = 2\nparam' = param - lr * inv_root(grad @ transpose(grad) + "
     "eye(rows), p) @ grad\n", "GS072", 4, 68),
    ("descending_of_a_matrix", H + "param' = param - lr * grad @ descending(grad)\n", "GS067", 3, 30),
    ("qr_precision_not_a_switch", H + "param' = param - lr * qr(grad, lr > 0)\n", "GS062", 3, 32),
    ("probe_local_used_outside", H + "hyper k: int = 2 >= 1\nprobe every k {\n  h = hvp(grad)\n}\nparam' = param - lr * h\n", "GS066", 7, 23),
    ("state_inside_probe", H + "probe every 2 {\n  state h = 0\n}\n" + U, "GS018", 4, 3),
    ("probe_period_real", H + "hyper k = 2\nstate h = 0\nprobe every k {\n  h' = hvp(grad)\n}\n" + U, "GS019", 3, 1),
    ("probe_period_unknown", H + "state h = 0\nprobe every kk {\n  h' = hvp(grad)\n}\n" + U, "GS019", 4, 1),
    ("probe_in_if", H + "if true {\nprobe every 2 {\n}\n}\n" + U, "GS012", 4, 1),
    ("onto_a_vector", H + "param' = param - lr * onto(grad, grad)\n", "GS065", 3, 34),
    ("lanczos_too_short", H + "hyper k: int = 5 >= 1\nstate U: subspace(k) = 0\nprobe every 1 {\n  U' = hessian_eigvecs(k, 3)\n}\nparam' = param - lr * onto(grad, U)\n", "GS064", 6, 8),
    ("subspace_rank_not_a_hyper", H + "state U: subspace(kk) = 0\nU' = U\nparam' = param - lr * onto(grad, U)\n", "GS064", 3, 1),
    ("subspace_never_found", H + "hyper k: int = 2 >= 1\nstate U: subspace(k) = 0\nU' = U\n"
     "param' = param - lr * onto(grad, U)\n", "GS064", 5, 1),
    ("subspace_scope_without_rank", H + "state U: subspace = 0\nU' = U\n" + U, "GS004", 3, 10),
    # blocks B { }: what a block may hold, what may cross its edge
    ("block_size_real", H + "hyper b = 4\nblocks b {\n  x = grad\n}\nparam' = param - lr * x\n", "GS074", 3, 1),
    ("element_state_in_block", H + "blocks 4 {\n  state m = 0\n  m' = grad\n}\n" + U, "GS074", 4, 3),
    ("update_in_block", H + "blocks 4 {\n  param' = param - lr * grad\n}\n", "GS074", 4, 3),
    ("block_in_block", H + "blocks 4 {\n  blocks 2 {\n    x = grad\n  }\n}\n" + U, "GS074", 4, 3),
    ("row_reduction_in_block", H + "blocks 4 {\n  x = row.sum(grad)\n}\nparam' = param - lr * x\n",
     "GS074", 4, 7),
    ("block_matrix_read_outside", H + "blocks 4 {\n  state L: (rows, rows) = 0\n  L' = L + grad @ transpose(grad)\n}\n"
                                      "param' = param - lr * L' @ grad\n", "GS075", 7, 23),
    ("matrix_read_inside_block", H + "A = grad @ transpose(grad)\nblocks 4 {\n  d = A @ grad\n}\n"
                                     "param' = param - lr * d\n", "GS075", 5, 7),
    ("block_state_set_outside", H + "blocks 4 {\n  state s: tensor = 0\n}\ns' = 1\n" + U, "GS075", 6, 1),
    # shape conditions, and a base in a projected space
    ("size_in_require", H + "require rows >= 2\n" + U, "GS047", 3, 9),
    ("size_condition_in_block", H + "blocks 4 {\n  if rows >= cols {\n    x = grad\n  } else {\n"
                                    "    x = 2 * grad\n  }\n}\nparam' = param - lr * x\n", "GS074", 4, 6),
    ("projected_base_starts_at_param", 'import "projected_partner.opt" as b\noptimizer x = galore(b)\n',
     "GS076", 3, 11),
    # refuted and unproven laws
    ("refuted_equals", H + "law equals adam\n" + U, "GS081", 3, 1),
    ("refuted_fixed_point", H + "law fixed_point\nparam' = param - lr * (grad + 1)\n", "GS081", 3, 1),
    ("refuted_claim", H + "law lr * grad > 0\n" + U, "GS081", 3, 1),
    ("refuted_claim_reading_no_value", H + "state m = 0\nm' = m + grad\nlaw m' != m'\n" + U, "GS081", 5, 1),
    ("refuted_invariance", H + "law invariant grad -> k * grad given k > 0\n" + U, "GS081", 3, 1),
]

OTHER_FILES = {"import_cycle": {"cycle_partner.opt": 'import "import_cycle.opt" as a\noptimizer b = a\n'},
               "projected_base_starts_at_param": {"projected_partner.opt": H + "state z = param\nz' = z\n" + U}}
"""Files a case reads besides its own."""

REPORTED_IN = {"import_cycle": "cycle_partner.opt", "projected_base_starts_at_param": "projected_partner.opt"}
"""Cases whose error is in another file: the cycle is found where it closes."""


def _first_error(name, text, folder):
    """The first error of the case's file, written to ``folder`` as NAME.opt (bytes as they
    are, None for no file) and checked by name, as `gradspec check NAME.opt` does."""
    if text is not None:
        (folder / f"{name}.opt").write_bytes(text if isinstance(text, bytes) else text.encode())
    for other, other_text in OTHER_FILES.get(name, {}).items():
        (folder / other).write_text(other_text)
    errors = [d for d in diagnose(f"{name}.opt") if d.severity == "error"]
    assert errors, f"{name}: no error"
    return errors[0]


def test_the_corpus_is_large_and_covers_every_category():
    codes = {case[2] for case in CASES}
    assert len(CASES) >= 40
    for family in ("GS00", "GS01", "GS02", "GS03", "GS04", "GS05", "GS06", "GS07", "GS08"):
        assert any(c.startswith(family) for c in codes), family


@pytest.mark.parametrize("name, text, code, line, column", CASES, ids=[c[0] for c in CASES])
def test_bad_spec_is_a_located_error(name, text, code, line, column, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    error = _first_error(name, text, tmp_path)
    assert (error.code, error.line, error.column) == (code, line, column), error.render()
    rendered = error.render()
    assert rendered.startswith(REPORTED_IN.get(name, f"{name}.opt"))
    assert f"error[{code}]" in rendered
    if line is not None:
        assert f"{line:>4} | " in rendered and "^" in rendered


def test_a_size_that_is_an_expression_is_quoted_as_written():
    """svd_right(grad, -1) used to print the parser's tree (UnOp(op='-', operand=Num(...)))."""
    text = H + "if matrix {\n  V = svd_right(grad, -1)\n  param' = param - lr * grad @ V @ transpose(V)\n} else {\n" + U + "}\n"
    with pytest.raises(gradspec.SpecError) as error:
        gradspec.check(gradspec.parse(text))
    assert error.value.code == "GS068" and error.value.message.endswith("not '-1'")


@pytest.mark.parametrize("name, words", [
    ("condition_undefined_at_the_defaults", "the condition has no value at these hyperparameters"),
    ("shape_condition_with_a_root", "combines rows and cols with +, -, *, / and ^ only"),
])
def test_a_condition_that_reads_no_tensor_is_not_told_it_does(name, words, tmp_path, monkeypatch):
    """Both were told "may use only hyperparameters", which they do (or sizes)."""
    monkeypatch.chdir(tmp_path)
    assert words in _first_error(name, dict((c[0], c[1]) for c in CASES)[name], tmp_path).message


def test_a_claim_false_whatever_the_values_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "refuted_claim_reading_no_value"
    found = _first_error(name, dict((c[0], c[1]) for c in CASES)[name], tmp_path)
    assert found.message.endswith("the claim is false whatever the values")  # it ended "at " and nothing
