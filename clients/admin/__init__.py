"""Parts of ``coalition-admin``: policy flags, output rendering and the commands."""
