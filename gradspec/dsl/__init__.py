"""The language: grammar, parser, AST, name resolution and adaptor expansion, diagnostics."""
