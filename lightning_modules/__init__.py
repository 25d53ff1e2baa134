"""Learning: the network, the losses, the metrics and the LightningModule that trains any step of any method."""
