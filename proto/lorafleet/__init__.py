"""The wire contract, importable by every side: generated gRPC stubs (`lorafleet.v1`, made by
`make proto`, never edited) and the upload archive format (`lorafleet.archive`).

Needs only grpcio, protobuf and the standard library: `client`, `server`, `trainer` and `loadtest`
all import it, and it imports none of them."""
