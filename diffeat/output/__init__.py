"""What a stage writes besides the store: run folders, long-format CSV, ``run.json`` records, and figures."""
