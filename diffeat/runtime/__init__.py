"""Where and how diffeat runs: devices, threads, memory budgets, progress, dask clusters, versions.

The lowest floor with ``diffeat.errors``: nothing here imports another diffeat package, so
every stage (extract, probe, cka) and the CLI can use one definition of each.
"""
