"""When and with whom: the round's graphs (pure, seeded), ``H_i`` policies, and the fragments'
place in a round. Nothing here communicates; every rank computes the same answers."""
