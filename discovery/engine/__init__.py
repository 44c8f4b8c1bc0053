"""The engine: the model adapter (the only code that calls TransformerLens), the edge graph, exact
patching and the one circuit evaluator. It imports only tasks and the package's base modules."""
