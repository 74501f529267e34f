"""One module per tab; each exposes TITLE and build(ctx) and holds thin UI handlers only."""
