"""Models: loading (paths, hub cache, built-ins), the computed block table, noise, ADM conversion."""
