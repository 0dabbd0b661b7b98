"""Reference predictors that need no training (sanity rows in reports)."""
