"""Test package. It is a package so that `run_on_ranks` children can import module-level rank functions as
`tests.test_<name>.<function>` (spawned/forkserver ranks import the function by name)."""
