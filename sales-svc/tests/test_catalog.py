"""The catalog (CatalogService): product lines, products, price lists and prices, pipelines and
stages, over real gRPC on a fresh PostgreSQL database, and one route through the gateway."""

from __future__ import annotations

import datetime as dt
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from crm.sales.v1 import catalog_pb2 as pb
from crm.sales.v1 import catalog_pb2_grpc
from crm.type.v1 import date_pb2, money_pb2
from crm_chassis import money
from crm_chassis.errors import read_rpc_error
from sales_svc import catalog
from sales_svc.tables import opportunities, price_list_items, products
from tests.support.harness import assert_problem, token

from .conftest import ADMIN, events, manager, rep


@pytest.fixture(scope="module")
def stub(ch):
    return catalog_pb2_grpc.CatalogServiceStub(ch)


def fails(call, request, code, field=None, reason=None, md=ADMIN):
    """The call fails with `code`, naming `field` among its violations and with `reason`."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, metadata=md, timeout=10)
    err = info.value
    assert err.code() == code, err.details()
    view = read_rpc_error(err)
    if field:
        assert field in [v.field for v in view.field_violations], (view.field_violations, err.details())
    if reason:
        assert view.reason == reason, (view.reason, err.details())
    return view


def mask(*paths):
    return field_mask_pb2.FieldMask(paths=list(paths))


def irt(units: int, nanos: int = 0, currency: str = "IRT") -> money_pb2.Money:
    return money_pb2.Money(currency_code=currency, units=units, nanos=nanos)


def new_line(stub, code=None):
    code = code or f"l-{uuid.uuid4().hex[:8]}"
    return stub.CreateProductLine(
        pb.CreateProductLineRequest(product_line=pb.ProductLine(code=code, display_name=f"Line {code}")),
        metadata=ADMIN,
    )


def new_product(stub, sku=None, line="", name="Laptop", **kw):
    sku = sku or f"SKU-{uuid.uuid4().hex[:8]}"
    return stub.CreateProduct(
        pb.CreateProductRequest(product=pb.Product(sku=sku, display_name=name, product_line=line, **kw)),
        metadata=ADMIN,
    )


def new_price_list(stub, currency="IRT", **kw):
    return stub.CreatePriceList(
        pb.CreatePriceListRequest(
            price_list=pb.PriceList(display_name=f"List {uuid.uuid4().hex[:8]}", currency_code=currency, **kw)
        ),
        metadata=ADMIN,
    )


def stage(name, kind=pb.STAGE_KIND_OPEN, probability=10.0, **kw):
    return pb.Stage(display_name=name, kind=kind, probability=probability, **kw)


def simple_stages():
    return [
        stage("First", probability=20),
        stage("Second", probability=60, required_fields=["amount", "expected_close_date"], rotting_days=14),
        stage("Won", pb.STAGE_KIND_WON, 100),
        stage("Lost", pb.STAGE_KIND_LOST, 0),
    ]


def new_pipeline(stub, stages=None, **kw):
    return stub.CreatePipeline(
        pb.CreatePipelineRequest(
            pipeline=pb.Pipeline(display_name=f"Pipe {uuid.uuid4().hex[:8]}", stages=stages or simple_stages(), **kw)
        ),
        metadata=ADMIN,
    )


def price_of(stub, product, price_list, quantity):
    return stub.GetPrice(
        pb.GetPriceRequest(product=product.name, price_list=price_list.name, quantity=quantity), metadata=rep("r1")
    )


def d(value: dt.date) -> date_pb2.Date:
    return date_pb2.Date(year=value.year, month=value.month, day=value.day)


def id_of(name: str) -> str:
    return name.rsplit("/", 1)[1]


# -- the seed --------------------------------------------------------------------------------


def test_the_migration_seeds_the_standard_pipeline_and_the_general_line(stub):
    pipes = stub.ListPipelines(pb.ListPipelinesRequest(filter="is_default = true"), metadata=rep("r1")).pipelines
    assert [p.display_name for p in pipes] == ["Standard"]
    std = pipes[0]
    assert [(s.display_name, s.kind, s.probability) for s in std.stages] == [
        ("Qualification", pb.STAGE_KIND_OPEN, 10),
        ("Needs analysis", pb.STAGE_KIND_OPEN, 25),
        ("Proposal", pb.STAGE_KIND_OPEN, 50),
        ("Negotiation", pb.STAGE_KIND_OPEN, 75),
        ("Won", pb.STAGE_KIND_WON, 100),
        ("Lost", pb.STAGE_KIND_LOST, 0),
    ]
    assert [s.position for s in std.stages] == list(range(6))
    lines = stub.ListProductLines(pb.ListProductLinesRequest(filter='code = "general"'), metadata=rep("r1"))
    assert [x.display_name for x in lines.product_lines] == ["General"]
    resolved = stub.ResolvePipeline(pb.ResolvePipelineRequest(), metadata=rep("r1"))
    assert (resolved.pipeline.name, resolved.matched) == (std.name, "default")
    assert stub.ListProducts(pb.ListProductsRequest(), metadata=rep("r1")).products == []


# -- product lines and products --------------------------------------------------------------


def test_products_are_validated_field_by_field(stub):
    fails(
        stub.CreateProductLine,
        pb.CreateProductLineRequest(product_line=pb.ProductLine(code="Not A Code!", display_name="")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "product_line.code",
    )
    view = fails(
        stub.CreateProduct,
        pb.CreateProductRequest(product=pb.Product(sku="", display_name="x", tax_rate="ten")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "product.tax_rate",
    )
    assert "product.sku" in [v.field for v in view.field_violations]  # every problem at once
    fails(
        stub.CreateProduct,
        pb.CreateProductRequest(product=pb.Product(sku="X-1", display_name="x", tax_rate="120")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "product.tax_rate",
    )
    fails(
        stub.CreateProduct,
        pb.CreateProductRequest(
            product=pb.Product(sku="X-1", display_name="x", product_line=f"productLines/{uuid.uuid4()}")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "product.product_line",
    )
    plain = new_product(stub, sku="VAT-DEFAULT")
    assert (plain.tax_rate, plain.unit, plain.active) == ("10", "unit", True)  # Iran's standard VAT
    nine = new_product(stub, sku="VAT-NINE", tax_rate="9.0000", unit="hour")
    assert (nine.tax_rate, nine.unit) == ("9", "hour")
    fails(
        stub.CreateProduct,
        pb.CreateProductRequest(product=pb.Product(sku="VAT-NINE", display_name="again")),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    fails(stub.GetProduct, pb.GetProductRequest(name="products/42"), grpc.StatusCode.INVALID_ARGUMENT, "name")
    fails(
        stub.GetProduct,
        pb.GetProductRequest(name=f"products/{uuid.uuid4()}"),
        grpc.StatusCode.NOT_FOUND,
        reason="PRODUCT_NOT_FOUND",
    )


def test_creates_are_idempotent_on_request_id(stub, svc):
    rid = str(uuid.uuid4())
    req = pb.CreateProductRequest(product=pb.Product(sku="IDEM-1", display_name="Once"), request_id=rid)
    first = stub.CreateProduct(req, metadata=ADMIN)
    again = stub.CreateProduct(req, metadata=ADMIN)
    assert again == first
    with svc.ctx.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(products.c.sku == "IDEM-1")).scalar() == 1
    assert len([e for e in events(svc, "product.created.v1") if e.subject == first.name]) == 1

    # Concurrent retries of one request: one product, every caller gets it.
    rid2 = str(uuid.uuid4())
    req2 = pb.CreateProductRequest(product=pb.Product(sku="IDEM-PAR", display_name="Once"), request_id=rid2)
    with ThreadPoolExecutor(4) as pool:
        names = set(pool.map(lambda _: stub.CreateProduct(req2, metadata=ADMIN, timeout=10).name, range(4)))
    assert len(names) == 1
    with svc.ctx.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).where(products.c.sku == "IDEM-PAR")).scalar() == 1

    preq = pb.CreatePipelineRequest(
        pipeline=pb.Pipeline(display_name="Idempotent pipe", stages=simple_stages()), request_id=rid
    )  # the same id for another kind of resource is another request
    p1 = stub.CreatePipeline(preq, metadata=ADMIN)
    assert stub.CreatePipeline(preq, metadata=ADMIN).name == p1.name
    lreq = pb.CreatePriceListRequest(
        price_list=pb.PriceList(display_name="Idem list", currency_code="IRR"), request_id=rid
    )
    assert stub.CreatePriceList(lreq, metadata=ADMIN).name == stub.CreatePriceList(lreq, metadata=ADMIN).name
    fails(
        stub.CreateProduct,
        pb.CreateProductRequest(product=pb.Product(sku="IDEM-2", display_name="x"), request_id="r" * 129),
        grpc.StatusCode.INVALID_ARGUMENT,
        "request_id",
    )


def test_updates_take_a_mask_and_refuse_a_stale_etag(stub, svc):
    line = new_line(stub)
    p = new_product(stub, name="Router")
    changed = stub.UpdateProduct(
        pb.UpdateProductRequest(
            product=pb.Product(
                name=p.name, etag=p.etag, display_name="روتر بی‌سیم", product_line=line.name, tax_rate="9"
            ),
            update_mask=mask("display_name", "product_line", "tax_rate"),
        ),
        metadata=manager("m1"),
    )
    assert (changed.display_name, changed.product_line, changed.tax_rate) == ("روتر بی‌سیم", line.name, "9")
    assert changed.etag != p.etag
    fails(  # the etag read before the change is stale now
        stub.UpdateProduct,
        pb.UpdateProductRequest(product=pb.Product(name=p.name, etag=p.etag, unit="box"), update_mask=mask("unit")),
        grpc.StatusCode.ABORTED,
    )
    fails(
        stub.UpdateProduct,
        pb.UpdateProductRequest(product=pb.Product(name=p.name, etag=changed.etag), update_mask=mask("colour")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "update_mask",
    )
    same = stub.UpdateProduct(  # nothing differs: nothing written, the etag stays
        pb.UpdateProductRequest(
            product=pb.Product(name=p.name, etag=changed.etag, tax_rate="9.0"), update_mask=mask("tax_rate")
        ),
        metadata=ADMIN,
    )
    assert same.etag == changed.etag
    off = stub.UpdateProduct(
        pb.UpdateProductRequest(
            product=pb.Product(name=p.name, etag=changed.etag, active=False), update_mask=mask("active")
        ),
        metadata=ADMIN,
    )
    assert not off.active
    updated = [e for e in events(svc, "product.updated.v1", pb.ProductEvent) if e.product.name == p.name]
    assert [list(e.changed_fields) for e in updated] == [["display_name", "product_line", "tax_rate"], ["active"]]
    l2 = stub.UpdateProductLine(
        pb.UpdateProductLineRequest(
            product_line=pb.ProductLine(name=line.name, etag=line.etag, display_name="Networking"),
            update_mask=mask("display_name"),
        ),
        metadata=ADMIN,
    )
    fails(
        stub.UpdateProductLine,
        pb.UpdateProductLineRequest(
            product_line=pb.ProductLine(name=line.name, etag=line.etag, description="late"),
            update_mask=mask("description"),
        ),
        grpc.StatusCode.ABORTED,
    )
    assert l2.display_name == "Networking"


def test_reps_read_the_catalog_and_only_managers_change_it(stub):
    fails(
        stub.CreateProduct,
        pb.CreateProductRequest(product=pb.Product(sku="REP-1", display_name="x")),
        grpc.StatusCode.PERMISSION_DENIED,
        md=rep("r9"),
    )
    p = new_product(stub, sku="MGR-1")
    assert stub.GetProduct(pb.GetProductRequest(name=p.name), metadata=rep("r9")).sku == "MGR-1"


def test_lists_page_by_keyset_and_filter(stub):
    a, b = new_line(stub, "page-a"), new_line(stub, "page-b")
    for i in range(7):
        new_product(stub, sku=f"PG-A-{i:02d}", line=a.name, name=f"Item {i}")
    for i in range(3):
        new_product(stub, sku=f"PG-B-{i:02d}", line=b.name)
    seen, token, pages = [], "", 0
    while True:
        page = stub.ListProducts(
            pb.ListProductsRequest(filter=f'product_line = "{a.name}"', page_size=3, page_token=token),
            metadata=rep("r1"),
        )
        seen += [x.sku for x in page.products]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"PG-A-{i:02d}" for i in range(7)] and pages == 3
    desc = stub.ListProducts(
        pb.ListProductsRequest(filter='sku = "PG-B*"', order_by="sku desc", page_size=2), metadata=rep("r1")
    )
    assert [x.sku for x in desc.products] == ["PG-B-02", "PG-B-01"]
    fails(  # a token continues only the query it came from
        stub.ListProducts,
        pb.ListProductsRequest(filter='sku = "PG-A*"', page_size=2, page_token=desc.next_page_token),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_token",
    )
    fails(stub.ListProducts, pb.ListProductsRequest(filter="colour = 1"), grpc.StatusCode.INVALID_ARGUMENT, "filter")
    fails(stub.ListProducts, pb.ListProductsRequest(order_by="price"), grpc.StatusCode.INVALID_ARGUMENT, "order_by")
    lines = stub.ListProductLines(pb.ListProductLinesRequest(filter='code = "page-*"'), metadata=rep("r1"))
    assert [x.code for x in lines.product_lines] == ["page-a", "page-b"]


def test_the_name_filter_matches_persian_letter_variants(stub):
    # Stored with Arabic yeh and kaf; searched with the Persian letters people type.
    p = new_product(stub, sku="FA-1", name="لپتاپ ايسوس كوچك")
    new_product(stub, sku="FA-2", name="مانیتور")
    for f in (
        'name = "ایسوس*"',
        'name : "کوچ"',
        'name = "fa-1*"',
        'name = "لپتاپ*" AND active = true',
        'name = "لپتاپ ایسوس کوچک"',  # the whole name
    ):
        got = stub.ListProducts(pb.ListProductsRequest(filter=f), metadata=rep("r1")).products
        assert [x.name for x in got] == [p.name], f
    for f in ('name = "ایسوس"', 'name = "fa-1"', 'name = "سوس*"'):  # neither the whole name nor a word's start
        assert stub.ListProducts(pb.ListProductsRequest(filter=f), metadata=rep("r1")).products == [], f
    fails(stub.ListProducts, pb.ListProductsRequest(filter='name > "a"'), grpc.StatusCode.INVALID_ARGUMENT, "filter")


def test_a_product_in_use_is_deactivated_not_deleted(stub):
    pl = new_price_list(stub)
    used, unused = new_product(stub), new_product(stub)
    stub.SetPriceListItems(
        pb.SetPriceListItemsRequest(price_list=pl.name, items=[pb.PriceListItem(product=used.name, unit_price=irt(5))]),
        metadata=ADMIN,
    )
    fails(
        stub.DeleteProduct,
        pb.DeleteProductRequest(name=used.name),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="PRODUCT_IN_USE",
    )
    stub.DeleteProduct(pb.DeleteProductRequest(name=unused.name), metadata=ADMIN)
    fails(stub.GetProduct, pb.GetProductRequest(name=unused.name), grpc.StatusCode.NOT_FOUND)
    line = new_line(stub)
    new_product(stub, line=line.name)
    fails(
        stub.DeleteProductLine,
        pb.DeleteProductLineRequest(name=line.name),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="PRODUCT_LINE_IN_USE",
    )


# -- price lists and prices ------------------------------------------------------------------


def test_price_lists_are_validated(stub):
    fails(
        stub.CreatePriceList,
        pb.CreatePriceListRequest(price_list=pb.PriceList(display_name="Bad", currency_code="rial")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "price_list.currency_code",
    )
    fails(
        stub.CreatePriceList,
        pb.CreatePriceListRequest(
            price_list=pb.PriceList(
                display_name="Backwards",
                currency_code="IRR",
                valid_from=date_pb2.Date(year=2026, month=5, day=1),
                valid_to=date_pb2.Date(year=2026, month=4, day=1),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "price_list.valid_to",
    )
    fails(
        stub.CreatePriceList,
        pb.CreatePriceListRequest(
            price_list=pb.PriceList(
                display_name="Feb 30", currency_code="IRR", valid_from=date_pb2.Date(year=2026, month=2, day=30)
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "price_list.valid_from",
    )
    for code in ("IRR", "IRT", "USD"):
        assert new_price_list(stub, code).currency_code == code
    dated = new_price_list(stub, valid_to=date_pb2.Date(year=2026, month=3, day=20))
    fails(  # the field changed is the one named
        stub.UpdatePriceList,
        pb.UpdatePriceListRequest(
            price_list=pb.PriceList(name=dated.name, valid_from=date_pb2.Date(year=2026, month=4, day=1)),
            update_mask=mask("valid_from"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "price_list.valid_from",
    )


def test_items_in_another_currency_or_negative_are_refused_by_index(stub):
    pl = new_price_list(stub, "IRR")
    p = new_product(stub)
    view = fails(
        stub.SetPriceListItems,
        pb.SetPriceListItemsRequest(
            price_list=pl.name,
            items=[
                pb.PriceListItem(product=p.name, unit_price=irt(100, currency="IRT")),  # tomans in a rial list
                pb.PriceListItem(product=p.name, min_quantity="10", unit_price=irt(-5, currency="IRR")),
                pb.PriceListItem(
                    product=p.name, min_quantity="20", unit_price=irt(5, currency="IRR"), discount_percent="150"
                ),
                pb.PriceListItem(product="products/x", unit_price=irt(5, currency="IRR")),
                pb.PriceListItem(product=p.name, min_quantity="0", unit_price=irt(5, currency="IRR")),
            ],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "items[0].unit_price.currency_code",
    )
    assert {v.field for v in view.field_violations} == {
        "items[0].unit_price.currency_code",
        "items[1].unit_price",
        "items[2].discount_percent",
        "items[3].product",
        "items[4].min_quantity",
    }
    fails(
        stub.SetPriceListItems,
        pb.SetPriceListItemsRequest(
            price_list=pl.name,
            items=[
                pb.PriceListItem(product=p.name, unit_price=irt(5, currency="IRR")),
                pb.PriceListItem(product=p.name, min_quantity="1.000", unit_price=irt(6, currency="IRR")),
            ],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "items[1]",
    )
    fails(
        stub.SetPriceListItems,
        pb.SetPriceListItemsRequest(
            price_list=pl.name,
            items=[pb.PriceListItem(product=f"products/{uuid.uuid4()}", unit_price=irt(5, currency="IRR"))],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "items[0].product",
    )
    assert stub.GetPriceList(pb.GetPriceListRequest(name=pl.name), metadata=ADMIN).item_count == 0


def test_upsert_and_replace_items_and_list_them(stub, svc):
    pl = new_price_list(stub, "IRT")
    ps = [new_product(stub) for _ in range(3)]
    r1 = stub.SetPriceListItems(
        pb.SetPriceListItemsRequest(
            price_list=pl.name,
            items=[pb.PriceListItem(product=p.name, unit_price=irt(1000 * (i + 1))) for i, p in enumerate(ps)],
        ),
        metadata=ADMIN,
    )
    assert (r1.written, r1.removed, r1.price_list.item_count) == (3, 0, 3)
    assert r1.price_list.etag != pl.etag
    fails(  # the list moved on: its old etag is stale
        stub.SetPriceListItems,
        pb.SetPriceListItemsRequest(price_list=pl.name, etag=pl.etag, items=[]),
        grpc.StatusCode.ABORTED,
    )
    r2 = stub.SetPriceListItems(  # upsert: one changed, one tier added, the others stay
        pb.SetPriceListItemsRequest(
            price_list=pl.name,
            etag=r1.price_list.etag,
            items=[
                pb.PriceListItem(product=ps[0].name, unit_price=irt(1500)),
                pb.PriceListItem(product=ps[0].name, min_quantity="10", unit_price=irt(1200), discount_percent="2.5"),
                pb.PriceListItem(product=ps[1].name, unit_price=irt(2000)),  # unchanged
            ],
        ),
        metadata=ADMIN,
    )
    assert (r2.written, r2.removed, r2.price_list.item_count) == (2, 0, 4)
    r3 = stub.SetPriceListItems(  # replace: exactly these afterwards
        pb.SetPriceListItemsRequest(
            price_list=pl.name,
            replace=True,
            items=[
                pb.PriceListItem(product=ps[0].name, min_quantity="10", unit_price=irt(1200), discount_percent="2.5"),
                pb.PriceListItem(product=ps[2].name, unit_price=irt(3100, 500_000_000)),
            ],
        ),
        metadata=ADMIN,
    )
    assert (r3.written, r3.removed, r3.price_list.item_count) == (1, 2, 2)
    listed, token = [], ""
    while True:
        page = stub.ListPriceListItems(
            pb.ListPriceListItemsRequest(parent=pl.name, page_size=1, page_token=token), metadata=rep("r1")
        )
        listed += list(page.items)
        token = page.next_page_token
        if not token:
            break
    assert sorted(
        (x.product, x.min_quantity, x.unit_price.units, x.unit_price.nanos, x.discount_percent) for x in listed
    ) == sorted([(ps[0].name, "10", 1200, 0, "2.5"), (ps[2].name, "1", 3100, 500_000_000, "0")])
    only = stub.ListPriceListItems(
        pb.ListPriceListItemsRequest(parent=pl.name, filter=f'product = "{ps[2].name}"'), metadata=rep("r1")
    )
    assert [x.product for x in only.items] == [ps[2].name]
    with svc.ctx.engine.connect() as conn:
        stored = conn.execute(
            sa.select(price_list_items.c.unit_price).where(price_list_items.c.product_id == id_of(ps[2].name))
        ).scalar()
    assert stored == Decimal("3100.5")
    fails(  # prices are in tomans now: the currency stays
        stub.UpdatePriceList,
        pb.UpdatePriceListRequest(
            price_list=pb.PriceList(name=pl.name, currency_code="IRR"), update_mask=mask("currency_code")
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="PRICE_LIST_HAS_ITEMS",
    )


def test_the_price_of_a_quantity_comes_from_its_tier(stub, svc):
    pl = new_price_list(stub, "IRT")
    p = new_product(stub, tax_rate="10")
    stub.SetPriceListItems(
        pb.SetPriceListItemsRequest(
            price_list=pl.name,
            items=[
                pb.PriceListItem(product=p.name, min_quantity="1", unit_price=irt(1000)),
                pb.PriceListItem(product=p.name, min_quantity="10", unit_price=irt(900)),
                pb.PriceListItem(product=p.name, min_quantity="100", unit_price=irt(800), discount_percent="5"),
            ],
        ),
        metadata=ADMIN,
    )

    def price(q):
        return stub.GetPrice(pb.GetPriceRequest(product=p.name, price_list=pl.name, quantity=q), metadata=rep("r1"))

    assert [(price(q).unit_price.units, price(q).min_quantity) for q in ("1", "9.5", "10", "99", "100", "250")] == [
        (1000, "1"),
        (1000, "1"),
        (900, "10"),
        (900, "10"),
        (800, "100"),
        (800, "100"),
    ]
    big = price("250")  # 250 × 800 = 200,000; 5 % off = 10,000; net 190,000; VAT 10 % = 19,000
    assert big.discount_percent == "5" and big.tax_rate == "10" and big.quantity == "250"
    assert [
        (m.currency_code, m.units)
        for m in (big.gross_amount, big.discount_amount, big.net_amount, big.tax_amount, big.total_amount)
    ] == [("IRT", 200_000), ("IRT", 10_000), ("IRT", 190_000), ("IRT", 19_000), ("IRT", 209_000)]
    assert big.total_text == "209,000 IRT"
    assert big.total_text_fa == "۲۰۹٬۰۰۰ تومان"
    with svc.ctx.engine.connect() as conn:  # what the opportunity and quote parts call
        assert catalog.price_for(conn, id_of(p.name), Decimal("12"), id_of(pl.name)) == (
            Decimal("900"),
            Decimal("0"),
            "IRT",
            Decimal("10"),
        )
    amounts = catalog.line_amounts(Decimal("3"), Decimal("333.33"), Decimal("10"), Decimal("9"), "IRR")
    assert amounts == (Decimal("1000"), Decimal("100"), Decimal("900"), Decimal("81"), Decimal("981"))
    assert money.format_amount(amounts.total, "IRR") == "981 IRR"
    fails(
        stub.GetPrice,
        pb.GetPriceRequest(product=p.name, price_list=pl.name, quantity="-1"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "quantity",
    )
    fails(
        stub.GetPrice,
        pb.GetPriceRequest(product=p.name, price_list=pl.name, quantity="a lot"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "quantity",
    )
    pricey = new_product(stub)
    stub.SetPriceListItems(
        pb.SetPriceListItemsRequest(
            price_list=pl.name, items=[pb.PriceListItem(product=pricey.name, unit_price=irt(10**12))]
        ),
        metadata=ADMIN,
    )
    assert price_of(stub, pricey, pl, "100000").total_amount.units == 11 * 10**16
    fails(  # 10^7 × 10^12 tomans is more than an amount can hold
        stub.GetPrice,
        pb.GetPriceRequest(product=pricey.name, price_list=pl.name, quantity="10000000"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "quantity",
    )
    fails(
        stub.GetPrice,
        pb.GetPriceRequest(product=p.name, price_list=pl.name, date="yesterday"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "date",
    )

    bulk_only = new_product(stub)
    stub.SetPriceListItems(
        pb.SetPriceListItemsRequest(
            price_list=pl.name, items=[pb.PriceListItem(product=bulk_only.name, min_quantity="10", unit_price=irt(50))]
        ),
        metadata=ADMIN,
    )
    fails(
        stub.GetPrice,
        pb.GetPriceRequest(product=bulk_only.name, price_list=pl.name, quantity="3"),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="QUANTITY_BELOW_MINIMUM",
    )
    unpriced = new_product(stub)
    fails(
        stub.GetPrice,
        pb.GetPriceRequest(product=unpriced.name, price_list=pl.name),
        grpc.StatusCode.NOT_FOUND,
        reason="PRICE_NOT_FOUND",
    )
    stub.UpdateProduct(
        pb.UpdateProductRequest(product=pb.Product(name=p.name, active=False), update_mask=mask("active")),
        metadata=ADMIN,
    )
    fails(
        stub.GetPrice,
        pb.GetPriceRequest(product=p.name, price_list=pl.name),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="PRODUCT_INACTIVE",
    )


def test_without_a_list_the_default_valid_on_the_date_prices(stub):
    p = new_product(stub)
    y1404 = new_price_list(
        stub, "IRT", is_default=True, valid_from=d(dt.date(2025, 3, 21)), valid_to=d(dt.date(2026, 3, 20))
    )
    y1405 = new_price_list(stub, "IRT", is_default=True, valid_from=d(dt.date(2026, 3, 21)))
    for pl, units in ((y1404, 100), (y1405, 120)):
        stub.SetPriceListItems(
            pb.SetPriceListItemsRequest(
                price_list=pl.name, items=[pb.PriceListItem(product=p.name, unit_price=irt(units))]
            ),
            metadata=ADMIN,
        )

    def price(day):
        got = stub.GetPrice(pb.GetPriceRequest(product=p.name, date=day), metadata=rep("r1"))
        return got.price_list, got.unit_price.units

    assert price("2026-01-01") == (y1404.name, 100)
    assert price("2026-03-20") == (y1404.name, 100)  # valid_to is inclusive
    assert price("2026-03-21") == (y1405.name, 120)
    assert price("1405/01/01") == (y1405.name, 120)  # a Jalali date: 1405/01/01 is 2026-03-21
    assert price("1404/12/29") == (y1404.name, 100)
    fails(
        stub.GetPrice,
        pb.GetPriceRequest(product=p.name, date="2024-01-01"),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="NO_DEFAULT_PRICE_LIST",
    )
    fails(  # a list named explicitly must be valid on the day too
        stub.GetPrice,
        pb.GetPriceRequest(product=p.name, price_list=y1405.name, date="2026-01-01"),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="PRICE_LIST_NOT_VALID",
    )
    fails(  # two defaults for one day: which would price it?
        stub.CreatePriceList,
        pb.CreatePriceListRequest(
            price_list=pb.PriceList(
                display_name="Overlap", currency_code="IRT", is_default=True, valid_from=d(dt.date(2026, 1, 1))
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="DEFAULT_PRICE_LISTS_OVERLAP",
    )
    fails(
        stub.UpdatePriceList,
        pb.UpdatePriceListRequest(
            price_list=pb.PriceList(name=y1404.name, valid_to=d(dt.date(2026, 4, 1))), update_mask=mask("valid_to")
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="DEFAULT_PRICE_LISTS_OVERLAP",
    )
    listed = stub.ListPriceLists(
        pb.ListPriceListsRequest(filter="is_default = true", order_by="valid_from"), metadata=rep("r1")
    )
    assert [x.name for x in listed.price_lists] == [y1404.name, y1405.name]
    assert [x.item_count for x in listed.price_lists] == [1, 1]
    # Deactivating the 1405 list leaves 1405's days without a default.
    stub.UpdatePriceList(
        pb.UpdatePriceListRequest(price_list=pb.PriceList(name=y1405.name, active=False), update_mask=mask("active")),
        metadata=ADMIN,
    )
    fails(
        stub.GetPrice,
        pb.GetPriceRequest(product=p.name, date="2026-06-01"),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="NO_DEFAULT_PRICE_LIST",
    )


# -- pipelines -------------------------------------------------------------------------------


def test_pipelines_are_validated_naming_the_field_or_rule(stub):
    def create(stages):
        return pb.CreatePipelineRequest(pipeline=pb.Pipeline(display_name="Bad", stages=stages))

    fails(
        stub.CreatePipeline,
        create([stage("A", probability=101), stage("W", pb.STAGE_KIND_WON, 100), stage("L", pb.STAGE_KIND_LOST, 0)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "pipeline.stages[0].probability",
    )
    fails(
        stub.CreatePipeline,
        create(
            [
                stage("A"),
                stage("B", required_fields=["amount", "budget"]),
                stage("W", pb.STAGE_KIND_WON, 100),
                stage("L", pb.STAGE_KIND_LOST, 0),
            ]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "pipeline.stages[1].required_fields",
    )
    fails(
        stub.CreatePipeline,
        create([stage("A"), stage("B"), stage("L", pb.STAGE_KIND_LOST, 0)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "pipeline.stages",
        reason="PIPELINE_NEEDS_ONE_WON_STAGE",
    )
    fails(
        stub.CreatePipeline,
        create([stage("W", pb.STAGE_KIND_WON, 100), stage("L", pb.STAGE_KIND_LOST, 0)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "pipeline.stages",
        reason="PIPELINE_NEEDS_OPEN_STAGE",
    )
    fails(
        stub.CreatePipeline,
        create(
            [
                stage("A"),
                stage("W", pb.STAGE_KIND_WON, 100),
                stage("L", pb.STAGE_KIND_LOST),
                stage("L2", pb.STAGE_KIND_LOST),
            ]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "pipeline.stages",
        reason="PIPELINE_NEEDS_ONE_LOST_STAGE",
    )
    fails(
        stub.CreatePipeline,
        create([stage("Same"), stage("same"), stage("W", pb.STAGE_KIND_WON), stage("L", pb.STAGE_KIND_LOST)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "pipeline.stages[1].display_name",
    )
    fails(
        stub.CreatePipeline,
        create([stage("A", rotting_days=-1), stage("W", pb.STAGE_KIND_WON), stage("L", pb.STAGE_KIND_LOST)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "pipeline.stages[0].rotting_days",
    )
    line, product = new_line(stub), new_product(stub)
    fails(
        stub.CreatePipeline,
        pb.CreatePipelineRequest(
            pipeline=pb.Pipeline(
                display_name="Both", product=product.name, product_line=line.name, stages=simple_stages()
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "pipeline.product",
    )
    p = new_pipeline(stub)
    assert [(s.display_name, list(s.required_fields), s.rotting_days) for s in p.stages][:2] == [
        ("First", [], 0),
        ("Second", ["amount", "expected_close_date"], 14),
    ]


def _open_opportunity(svc, pipeline: pb.Pipeline, stage_name: str, state: str = "open") -> None:
    """An opportunity row straight in the core table (the opportunity part is not here)."""
    with svc.ctx.engine.begin() as conn:
        conn.execute(
            opportunities.insert().values(
                name=f"Deal {uuid.uuid4().hex[:6]}",
                pipeline_id=id_of(pipeline.name),
                stage_id=id_of(stage_name),
                currency_code="IRT",
                probability=60,
                state=state,
            )
        )


def test_replacing_stages_keeps_ids_and_refuses_to_drop_an_occupied_stage(stub, svc):
    p = new_pipeline(stub)
    first, second, won, lost = p.stages
    _open_opportunity(svc, p, second.name)

    def update(stages, etag=""):
        return stub.UpdatePipeline(
            pb.UpdatePipelineRequest(
                pipeline=pb.Pipeline(name=p.name, etag=etag, stages=stages), update_mask=mask("stages")
            ),
            metadata=manager("m1"),
        )

    renamed = pb.Stage()
    renamed.CopyFrom(second)
    renamed.display_name = "Proposal sent"
    renamed.probability = 55
    out = update([first, stage("Demo", probability=40), renamed, won, lost], etag=p.etag)
    assert [s.display_name for s in out.stages] == ["First", "Demo", "Proposal sent", "Won", "Lost"]
    assert [s.name for s in out.stages if s.display_name != "Demo"] == [first.name, second.name, won.name, lost.name]
    assert out.stages[1].name.startswith(p.name + "/stages/") and out.stages[1].name not in {s.name for s in p.stages}
    assert [s.position for s in out.stages] == [0, 1, 2, 3, 4] and out.stages[2].probability == 55
    assert out.etag != p.etag
    fails(  # the etag read before is stale
        stub.UpdatePipeline,
        pb.UpdatePipelineRequest(
            pipeline=pb.Pipeline(name=p.name, etag=p.etag, display_name="x"), update_mask=mask("display_name")
        ),
        grpc.StatusCode.ABORTED,
    )

    view = fails(  # dropping the stage an open opportunity is in
        stub.UpdatePipeline,
        pb.UpdatePipelineRequest(
            pipeline=pb.Pipeline(name=p.name, stages=[first, won, lost]), update_mask=mask("stages")
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="STAGE_HAS_OPEN_OPPORTUNITIES",
    )
    assert view.metadata["stage"] == second.name and "Proposal sent" in view.message
    fails(  # nor may its kind change under it
        stub.UpdatePipeline,
        pb.UpdatePipelineRequest(
            pipeline=pb.Pipeline(
                name=p.name,
                stages=[first, pb.Stage(name=second.name, display_name="Proposal sent", kind=pb.STAGE_KIND_WON), lost],
            ),
            update_mask=mask("stages"),
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="STAGE_KIND_IN_USE",
    )
    other = new_pipeline(stub)
    fails(  # a stage of another pipeline is not kept here
        stub.UpdatePipeline,
        pb.UpdatePipelineRequest(
            pipeline=pb.Pipeline(name=p.name, stages=[other.stages[0], won, lost]), update_mask=mask("stages")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "pipeline.stages[0].name",
    )
    # The empty stages (First, Demo) may go; the occupied one stays with its id.
    kept = update([renamed, won, lost])
    assert [s.name for s in kept.stages] == [second.name, won.name, lost.name]
    assert [s.position for s in kept.stages] == [0, 1, 2]
    with svc.ctx.engine.connect() as conn:
        assert catalog.first_stage(conn, id_of(p.name)) == (id_of(second.name), Decimal("55.00"))
    # An opportunity that ended in Lost keeps that stage too.
    _open_opportunity(svc, p, lost.name, state="lost")
    fails(
        stub.UpdatePipeline,
        pb.UpdatePipelineRequest(
            pipeline=pb.Pipeline(name=p.name, stages=[renamed, won, stage("Lost again", pb.STAGE_KIND_LOST)]),
            update_mask=mask("stages"),
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="STAGE_HAS_OPPORTUNITIES",
    )
    fails(
        stub.DeletePipeline,
        pb.DeletePipelineRequest(name=p.name),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="PIPELINE_IN_USE",
    )
    ev = [e for e in events(svc, "pipeline.updated.v1", pb.PipelineEvent) if e.pipeline.name == p.name]
    assert [list(e.changed_fields) for e in ev] == [["stages"], ["stages"]]


def test_resolve_pipeline_prefers_product_then_line_then_default(stub, svc):
    std = stub.ListPipelines(pb.ListPipelinesRequest(filter="is_default = true"), metadata=ADMIN).pipelines[0]
    line, bare_line = new_line(stub), new_line(stub)
    own = new_product(stub, line=line.name)
    in_line = new_product(stub, line=line.name)
    lineless = new_product(stub)
    in_bare = new_product(stub, line=bare_line.name)
    p_line = new_pipeline(stub, product_line=line.name)
    p_own = new_pipeline(stub, product=own.name)

    def resolve(**kw):
        r = stub.ResolvePipeline(pb.ResolvePipelineRequest(**kw), metadata=rep("r1"))
        return r.pipeline.name, r.matched

    assert resolve(product=own.name) == (p_own.name, "product")
    assert resolve(product=in_line.name) == (p_line.name, "product_line")
    assert resolve(product_line=line.name) == (p_line.name, "product_line")
    assert resolve(product=lineless.name) == (std.name, "default")
    assert resolve(product=in_bare.name) == (std.name, "default")
    assert resolve(product=lineless.name, product_line=line.name) == (p_line.name, "product_line")
    fails(
        stub.ResolvePipeline, pb.ResolvePipelineRequest(product=f"products/{uuid.uuid4()}"), grpc.StatusCode.NOT_FOUND
    )
    with svc.ctx.engine.connect() as conn:
        assert catalog.pipeline_for(conn, product_id=id_of(own.name)) == id_of(p_own.name)
        assert catalog.pipeline_for(conn, product_line_id=id_of(line.name)) == id_of(p_line.name)
        assert catalog.pipeline_for(conn) == id_of(std.name)
        assert catalog.first_stage(conn, id_of(std.name)) == (id_of(std.stages[0].name), Decimal("10.00"))
    fails(  # one active pipeline per product line
        stub.CreatePipeline,
        pb.CreatePipelineRequest(
            pipeline=pb.Pipeline(display_name="Second for line", product_line=line.name, stages=simple_stages())
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        reason="PIPELINE_ALREADY_ASSIGNED",
    )
    # An inactive pipeline is passed over.
    stub.UpdatePipeline(
        pb.UpdatePipelineRequest(pipeline=pb.Pipeline(name=p_own.name, active=False), update_mask=mask("active")),
        metadata=ADMIN,
    )
    assert resolve(product=own.name) == (p_line.name, "product_line")

    # The default moves to a new default pipeline and back; it cannot just be dropped.
    fails(
        stub.UpdatePipeline,
        pb.UpdatePipelineRequest(pipeline=pb.Pipeline(name=std.name, is_default=False), update_mask=mask("is_default")),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="DEFAULT_PIPELINE_REQUIRED",
    )
    fails(
        stub.DeletePipeline,
        pb.DeletePipelineRequest(name=std.name),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="DEFAULT_PIPELINE_REQUIRED",
    )
    newer = new_pipeline(stub, is_default=True)
    assert resolve(product=lineless.name) == (newer.name, "default")
    assert not stub.GetPipeline(pb.GetPipelineRequest(name=std.name), metadata=ADMIN).is_default
    stub.UpdatePipeline(
        pb.UpdatePipelineRequest(pipeline=pb.Pipeline(name=std.name, is_default=True), update_mask=mask("is_default")),
        metadata=ADMIN,
    )
    assert resolve(product=lineless.name) == (std.name, "default")
    stub.DeletePipeline(pb.DeletePipelineRequest(name=newer.name), metadata=ADMIN)
    fails(
        stub.GetPipeline, pb.GetPipelineRequest(name=newer.name), grpc.StatusCode.NOT_FOUND, reason="PIPELINE_NOT_FOUND"
    )


def test_pipelines_list_in_keyset_pages_with_their_stages(stub):
    line = new_line(stub)
    made = [
        stub.CreatePipeline(
            pb.CreatePipelineRequest(pipeline=pb.Pipeline(display_name=f"ZZ paged {i}", stages=simple_stages())),
            metadata=ADMIN,
        ).name
        for i in range(5)
    ]
    seen, token = [], ""
    while True:
        page = stub.ListPipelines(
            pb.ListPipelinesRequest(filter='display_name = "ZZ paged*"', page_size=2, page_token=token),
            metadata=rep("r1"),
        )
        assert all(len(x.stages) == 4 for x in page.pipelines)
        seen += [x.name for x in page.pipelines]
        token = page.next_page_token
        if not token:
            break
    assert seen == made
    fails(
        stub.UpdatePipeline,
        pb.UpdatePipelineRequest(
            pipeline=pb.Pipeline(name=made[1], display_name="ZZ paged 0"), update_mask=mask("display_name")
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    fails(
        stub.ListPipelines,
        pb.ListPipelinesRequest(filter=f'product_line = "{line.code}"'),
        grpc.StatusCode.INVALID_ARGUMENT,
        "filter",
    )


# -- over HTTP -------------------------------------------------------------------------------


def test_http_routes_create_price_and_name_the_bad_field(svc):
    from crm_gateway import create_app
    from crm_gateway.clients import Clients

    app = create_app(Clients({"customer": "127.0.0.1:9", "sales": f"127.0.0.1:{svc.port}", "reporting": "127.0.0.1:9"}))
    http = app.test_client()
    auth = {"Authorization": f"Bearer {token('sales_manager', 'm-http')}"}
    key = str(uuid.uuid4())
    created = http.post(
        "/v1/products",
        json={"sku": "HTTP-1", "displayName": "هارد اکسترنال", "taxRate": "10"},
        headers={**auth, "Idempotency-Key": key},
    )
    assert created.status_code == 201, created.get_data(as_text=True)
    product = created.get_json()
    assert product["name"].startswith("products/") and product["taxRate"] == "10"
    again = http.post(
        "/v1/products", json={"sku": "HTTP-1", "displayName": "x"}, headers={**auth, "Idempotency-Key": key}
    )
    assert again.get_json()["name"] == product["name"]
    bad = http.post("/v1/products", json={"sku": "HTTP-2", "displayName": "x", "taxRate": "ده"}, headers=auth)
    assert_problem(bad, 400, "tax_rate")  # the body's own field
    pl = http.post("/v1/priceLists", json={"displayName": "HTTP list", "currencyCode": "IRT"}, headers=auth).get_json()
    wrong = http.post(
        f"/v1/{pl['name']}:setItems",
        json={"items": [{"product": product["name"], "unitPrice": {"currencyCode": "IRR", "units": "5000"}}]},
        headers=auth,
    )
    assert_problem(wrong, 400, "items[0].unit_price.currency_code")
    ok = http.post(
        f"/v1/{pl['name']}:setItems",
        json={"items": [{"product": product["name"], "unitPrice": {"currencyCode": "IRT", "units": "1250000"}}]},
        headers=auth,
    )
    assert ok.status_code == 200, ok.get_data(as_text=True)
    price = http.get(f"/v1/{product['name']}:price?price_list={pl['name']}&quantity=2", headers=auth)
    assert price.status_code == 200, price.get_data(as_text=True)
    body = price.get_json()
    assert body["netAmount"] == {"currencyCode": "IRT", "units": "2500000"}
    assert body["totalText"] == "2,750,000 IRT" and body["totalTextFa"] == "۲٬۷۵۰٬۰۰۰ تومان"
    assert_problem(http.get(f"/v1/{product['name']}:price?quantity=zero", headers=auth), 400, "quantity")
