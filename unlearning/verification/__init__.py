"""Verification: membership-inference attacks, utility and scenario metrics, the report a
candidate model gets and the gate that decides whether it may be published."""
