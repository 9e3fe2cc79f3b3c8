"""The run itself: the loop that leases work and closes rounds, the scheduler, the Flower transport, the model store and the outer optimizer."""
