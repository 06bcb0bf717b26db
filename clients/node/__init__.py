"""The partner node: a daemon that receives, verifies, decrypts and stores, plus its commands."""
