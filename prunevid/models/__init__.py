"""One small adapter per model family; `prunevid.patch` dispatches on the model class."""
