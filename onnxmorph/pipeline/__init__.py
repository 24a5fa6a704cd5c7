"""Running passes: limits, verification and the receipt (`run`), recipes, receipts and `inspect`."""
