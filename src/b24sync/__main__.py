from b24sync.cli import app

app()
