"""Durable state: schema, fencing and one repository per concern. All SQL lives here."""
