"""The symbolic checker: a spec's IR as SymPy, its hyperparameter domains, numerical safety,
laws, semantic diffs and LaTeX. Everything here runs once, when a spec is checked; nothing here
is on an optimizer's step path."""
