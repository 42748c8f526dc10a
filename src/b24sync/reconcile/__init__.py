"""`b24sync reconcile`: the portal's leads compared with Core's users, and the drifted users
sent again (see `service.py`)."""
