"""What starts and drives the roles, never deployed as one: `monolith up` (stack), `monolith replay`,
`monolith bench` and `monolith chaos`."""
