"""What the journeys over the gateway share (tests/test_*journey.py): callers by role, the
answer of a call that must succeed, rial amounts, and the sales desk they start from."""

from __future__ import annotations

from tests.support.harness import token


def as_(roles: str, sub: str) -> dict:
    """The Authorization header of `sub` with these roles."""
    return {"Authorization": f"Bearer {token(roles, sub)}"}


def ok(resp, status: int = 200) -> dict:
    """The JSON of a gateway answer that must have this status (else its body in the failure)."""
    assert resp.status_code == status, f"{resp.status_code}: {resp.get_data(as_text=True)}"
    return resp.get_json()


def irr(units: int) -> dict:
    return {"currencyCode": "IRR", "units": str(units)}


def sales_desk(http, admin: dict, team_name: str, manager: str, rep: str) -> tuple[dict, dict]:
    """An admin's team (its manager and one rep) and a priced product (ERP licence, 10 % VAT)
    in its own product line: (team, product)."""
    team = ok(http.post("/v1/teams", json={"displayName": team_name, "manager": manager}, headers=admin), 201)
    ok(http.post(f"/v1/{team['name']}:addMembers", json={"members": [rep]}, headers=admin))
    line = ok(http.post("/v1/productLines", json={"code": "erp", "displayName": "ERP"}, headers=admin), 201)
    product = ok(
        http.post(
            "/v1/products",
            json={"sku": "ERP-1", "displayName": "ERP licence", "productLine": line["name"], "taxRate": "10"},
            headers=admin,
        ),
        201,
    )
    return team, product
