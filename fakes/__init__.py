"""Loopback stand-ins for the outside world: Twilio, the Messages API, GitHub, flyctl, a git
`origin`, and each half of the pair for testing the other. The tests, the benchmarks and the
local console (`./scripts/dev --demo`) all use these, so none of them imports another's code."""
