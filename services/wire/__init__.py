"""Wire code shared by every service: the array codec and, later, generated gRPC stubs."""
