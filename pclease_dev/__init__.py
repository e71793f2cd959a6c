"""Development tools of the pclease repository (the tests, the demo and the benchmarks
use them); not part of any distribution."""
