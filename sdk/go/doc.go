// Package chime is the Go SDK of chime, a distributed job scheduler: job handlers
// (a session with the coordinator, chime.v1.WorkerGateway), item handlers (a
// subscription to a chime worker's delivery service, chime.v1.Deliveries) and a
// producer client for the delay queue (chime.v1.Queue).
//
//	w, err := chime.NewWorker(chime.WithCoordinator("http://127.0.0.1:7070"),
//		chime.WithDeliveries("http://127.0.0.1:7071"), chime.WithTokenFile("worker.token"))
//	w.HandleJob("report.daily", func(ctx context.Context, j *chime.Job) (string, error) {
//		j.Logf("shard %d/%d", j.ShardIndex, j.ShardTotal)
//		return "done", nil
//	})
//	w.HandleItem("coupon.remind", func(ctx context.Context, d *chime.Delivery) error {
//		return nil // ack
//	})
//	err = w.Run(context.Background()) // until SIGTERM/SIGINT, then drains
//
// The generated protobuf and gRPC stubs are in the chimev1 package.
package chime
