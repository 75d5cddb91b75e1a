"""Jobs in one process on one device, without Ray: the attack and training runners and their input checks."""
