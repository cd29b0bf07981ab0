"""A throwaway fifth destination ("echo"), written the way docs/DESTINATIONS.md says to add one:
one mapping module, one stand-in module, one registry entry. It proves the rest of the product
picks a destination up from the registry alone."""
