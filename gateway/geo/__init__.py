"""Who and where the client is: the real client address behind trusted proxies, and its
location from GeoIP2 City and ASN databases."""
