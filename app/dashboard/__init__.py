"""The compliance dashboard: server-rendered pages for operators and auditors."""
