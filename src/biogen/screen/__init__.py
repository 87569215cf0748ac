"""Virtual screening: stages (filters, scorers), fusion, selection, metrics, report."""
