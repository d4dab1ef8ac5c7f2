"""The training ledgers, as the parties write them during a run.

A *ledger* is one party's signed log of one run: append-only JSON Lines, each record
hash-chained to the one before and signed with the party's Ed25519 key (`chain`).
`HospitalLedger` and `ServerLedger` decide what a hospital and the server record in
theirs; the federation calls them. Verifying ledgers afterwards is `fedmed.audit`'s
work, which reads them with `chain.LedgerFile`.
"""
