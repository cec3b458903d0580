// The Go SDK of chime: module users `go get`; the offline build here is in README.md.
module github.com/chime-scheduler/chime/sdk/go

go 1.19

require (
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)

// Tested with golang/protobuf 1.5 (grpc 1.33 needs it for its status protos).
require github.com/golang/protobuf v1.5.2 // indirect
