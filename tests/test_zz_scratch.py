import pytest
pytestmark = pytest.mark.django_db
def test_docs(client):
    r = client.get("/v1/docs")
    print(r.status_code, r.content[:3000].decode())
def test_charset(tenant):
    from rest_framework.test import APIClient
    c = tenant["client"]
    r = c.generic("POST", "/v1/keys", b'{"name": "x"}', content_type="application/json; charset=bogus")
    print("charset", r.status_code, r.content)
    r = c.generic("POST", "/v1/keys", b'[' * 100000, content_type="application/json")
    print("deep", r.status_code, r.content)
    r = c.generic("POST", "/v1/keys", b'\xff\xfe{', content_type="application/json")
    print("bytes", r.status_code, r.content)
    r = c.generic("POST", "/v1/keys", b'{"name": "x"}', content_type="application/json", CONTENT_LENGTH="-1")
    print("neg", r.status_code, r.content)
