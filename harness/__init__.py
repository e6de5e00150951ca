"""What the tests and the benchmarks both run: the plain reference implementation of MEDS (the oracle of
exactness tests and the benchmark's baseline) and launchers of real servers (the service in a thread or a
process, a `meds worker`, a redis-server). Never imported by the service or the client."""
