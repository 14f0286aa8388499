"""mcserve server: model, engine, HTTP front end."""
