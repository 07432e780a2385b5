"""The balance study: the measurements behind the papers' findings, at small scale."""
