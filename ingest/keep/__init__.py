"""Keep: locators, signatures, the block store interface and its implementations
(the directory store, the HTTP Keep client), and the factory that builds them."""
