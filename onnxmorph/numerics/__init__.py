"""Pure numpy and tuples: the depth factorisations, subnet splits, width fillings and conv geometry."""
