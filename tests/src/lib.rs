//! Network-namespace sandbox for ferry's kernel tests.
