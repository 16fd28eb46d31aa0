"""Money and books: the electricity tariff and API prices, the SQLite ledger, `student report`."""
