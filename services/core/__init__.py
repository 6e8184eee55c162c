"""What every modalign service shares: Kafka, the local broker, gRPC plumbing, metrics, images and blobs."""
