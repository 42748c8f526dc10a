"""The Bitrix service: RabbitMQ events -> BullMQ jobs -> Bitrix24 leads -> replies."""
