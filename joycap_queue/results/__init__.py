"""What finished jobs give back: sidecar files beside images, and exports."""
