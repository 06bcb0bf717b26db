"""``coalition-keys``: the command line that makes and inspects the PKI directory."""
