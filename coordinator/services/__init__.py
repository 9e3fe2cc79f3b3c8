"""What the coordinator serves and runs beside the loop: the gRPC service (blobs, enrollment, status), the status views, the fleet proxy, the SuperLink, PKI, process launching and revocation."""
