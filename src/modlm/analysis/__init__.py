"""Numbers about models: analytic FLOPs, what the routers did, evaluation over batches, reports.
Plain functions of models and their outputs; no Lightning, no data loading."""
