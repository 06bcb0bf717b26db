"""Generated wire code (make proto)."""
