"""`cae2 inspect`: a target store's status and a visual report of its views and targets; a run dir's summary."""
