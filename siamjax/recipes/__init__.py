"""End-to-end recipes: a config in, a trained model and a results record out."""
