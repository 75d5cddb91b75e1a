"""What an attack leaves: per-image record files and summaries, report tables and plots, model cards."""
