"""``coalition-console``: an operator's web console over the broker's Admin service."""
