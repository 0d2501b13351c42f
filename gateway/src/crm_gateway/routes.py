"""The HTTP routes, read from the contracts: each RPC's `google.api.http` annotation gives its
verb, path template and body (the convention grpc-gateway, Envoy's gRPC-JSON transcoder and
Cloud Endpoints read), so a new RPC's route lives beside it in its .proto. One generic handler
(app.py) transcodes JSON <-> protobuf for all of them, and the OpenAPI document (openapi.py) is
generated from the same routes, so the three cannot drift apart.

A path variable binds a request field to a resource name, `{name=customers/*}`; its wildcards
take their names from the service's resource patterns (`google.api.resource_definition`
"customers/{customer_id}"), so the HTTP path reads /v1/customers/{customer_id}. What the
annotation cannot say stays declared here, per RPC: which bytes field a multipart upload's
file fills (UPLOADS) and which media types a streamed download answers (DOWNLOADS). The rest is
convention: a POST to a collection (no `:verb`) answers 201 Created with a Location;
Idempotency-Key fills `request_id` and If-Match fills `etag` (transcode.py).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from google.api import annotations_pb2, resource_pb2
from google.protobuf import descriptor, descriptor_pb2

from crm_chassis.registry import load_registry
from crm_chassis.resources import singular_of

from .public import Public


def package_services(package: str) -> list[descriptor.ServiceDescriptor]:
    """Every gRPC service declared in a proto package's generated modules (crm.sales.v1 holds
    LeadService, OpportunityService, ...), in file-name order."""
    found = []
    for entry in sorted(resources.files(importlib.import_module(package)).iterdir(), key=lambda f: f.name):
        if entry.name.endswith("_pb2.py"):
            module = importlib.import_module(f"{package}.{entry.name[:-3]}")
            found.extend(module.DESCRIPTOR.services_by_name.values())
    return found


def _served() -> tuple[dict[str, descriptor.ServiceDescriptor], dict[str, str]]:
    registry = load_registry()
    services, clients = {}, {}
    for name in registry.gateway.calls if registry.gateway else ():
        svc = registry.service(name)
        for service in package_services(svc.proto_package) if svc.proto_package else ():
            services[service.full_name] = service
            clients[service.full_name] = svc.domain
    return services, clients


# The services the gateway serves, by full name: those of every proto package of the services
# services.toml's [gateway] calls; every annotated RPC of each becomes a route. CLIENT_KEYS: the
# client (channel) each is called through, the owning service's domain.
SERVICES, CLIENT_KEYS = _served()

CSV = "text/csv"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
PNG = "image/png"
SVG = "image/svg+xml"
# reporting-svc's report exports (report_files.py): the table, the chart and table, the chart
REPORT_FILES = (CSV, XLSX, PDF, PNG, SVG)
# A multipart/form-data body's file part fills this bytes field of the request (transcode.py).
UPLOADS: dict[str, str] = {
    "crm.customer.v1.CustomerService.ImportCustomers": "content",
    "crm.campaign.v1.SegmentService.ImportSegmentMembers": "content",  # a CSV of customers
}
# The media types a server-streaming download answers (its first message names which one).
DOWNLOADS: dict[str, tuple[str, ...]] = {
    "crm.customer.v1.CustomerService.ExportCustomers": (CSV, XLSX, PDF, DOCX),
    "crm.customer.v1.CustomerService.DownloadImportErrorReport": (CSV, XLSX),
    "crm.sales.v1.QuoteService.RenderQuotePdf": (PDF,),
    "crm.sales.v1.InvoiceService.ExportTaxInvoices": ("application/x-ndjson", XLSX),
    "crm.sales.v1.InvoiceService.RenderInvoicePdf": (PDF,),
    "crm.sales.v1.LeadService.ExportLeads": (CSV, XLSX),
    "crm.sales.v1.OpportunityService.ExportOpportunities": (CSV, XLSX),
    "crm.support.v1.TicketService.ExportTickets": (CSV, XLSX),
    "crm.reporting.v1.ReportingService.ExportCustomersBySource": REPORT_FILES,
    "crm.reporting.v1.ReportingService.ExportSupportReport": REPORT_FILES,
    "crm.reporting.v1.ReportingService.ExportAcquisitionReport": REPORT_FILES,
    "crm.reporting.v1.ReportingService.ExportPipelineReport": REPORT_FILES,
    "crm.reporting.v1.ReportingService.ExportForecastReport": REPORT_FILES,
    "crm.reporting.v1.ReportingService.ExportLoyaltyReport": REPORT_FILES,
    "crm.reporting.v1.ReportingService.ExportCampaignReport": REPORT_FILES,
    "crm.reporting.v1.ReportingService.ExportCustomerTimeline": REPORT_FILES,
    "crm.reporting.v1.ReportingService.ExportSalesReport": REPORT_FILES,
    "crm.reporting.v1.ValueService.ExportValueReport": REPORT_FILES,
    # an attachment answers the type it was uploaded with
    "crm.support.v1.TicketService.GetAttachment": ("application/pdf", "image/*", "*/*"),
}
OCTET_STREAM = ("application/octet-stream",)
# Routes reached without a bearer token, with their own authentication and limits (public.py).
PUBLIC: dict[str, Public] = {
    # A PBX's call events (support-svc calls.py checks the body's HMAC signature).
    "crm.support.v1.CallService.PostCallEvent": Public(
        per_minute=1200, max_bytes=64 * 1024, raw_body="body", headers={"signature": "X-Crm-Signature"}
    ),
    # survey links (support-svc surveys.py): the link's signed token is the credential
    "crm.support.v1.SurveyService.GetSurveyByToken": Public(per_minute=30, max_bytes=16 * 1024),
    "crm.support.v1.SurveyService.SubmitSurvey": Public(
        per_minute=30, max_bytes=16 * 1024, client_address="client_address"
    ),
    # support-svc channels.proto: the public web form (its site key is checked by the service)
    "crm.support.v1.ChannelService.SubmitWebForm": Public(
        per_minute=10, max_bytes=32 * 1024, client_address="client_address", description="The site's contact form."
    ),
    # campaign-svc consent.proto: confirmation and unsubscribe links (the signed token is the
    # credential), RFC 8058's one-click POST (any body), the SMS provider's inbound messages
    "crm.campaign.v1.ConsentService.GetOptIn": Public(per_minute=30, max_bytes=4 * 1024),
    "crm.campaign.v1.ConsentService.ConfirmOptIn": Public(
        per_minute=30, max_bytes=4 * 1024, client_address="client_address"
    ),
    "crm.campaign.v1.ConsentService.GetUnsubscribe": Public(per_minute=30, max_bytes=4 * 1024),
    "crm.campaign.v1.ConsentService.Unsubscribe": Public(
        per_minute=30,
        max_bytes=4 * 1024,
        raw_body="body",
        client_address="client_address",
        description="An unsubscribe link, and the List-Unsubscribe one-click POST (RFC 8058).",
    ),
    "crm.campaign.v1.ConsentService.PostInboundSms": Public(
        per_minute=1200, max_bytes=16 * 1024, description="SMS received by the company's line (stop keywords)."
    ),
    # campaign-svc tracking.proto: the open pixel (a GIF even for a bad token) and tracked clicks
    # (302 to the signed target); bounces and SMS receipts from providers (BOUNCE_KEYS); the
    # company site's click-stream (TRACKING_SITE_KEYS)
    # (high limits: a webmail's image proxy fetches for many readers from a few addresses)
    "crm.campaign.v1.TrackingService.GetOpenPixel": Public(
        per_minute=6000,
        max_bytes=1024,
        raw_response="data",
        headers={"user_agent": "User-Agent"},
        cache_control="no-store, no-cache, must-revalidate, max-age=0",
    ),
    "crm.campaign.v1.TrackingService.FollowClick": Public(
        per_minute=1200,
        max_bytes=1024,
        redirect="location",
        client_address="client_address",
        headers={"user_agent": "User-Agent"},
        cache_control="no-store",
    ),
    "crm.campaign.v1.TrackingService.FollowShortLink": Public(
        per_minute=1200,
        max_bytes=1024,
        redirect="location",
        client_address="client_address",
        headers={"user_agent": "User-Agent"},
        cache_control="no-store",
    ),
    "crm.campaign.v1.TrackingService.PostBounce": Public(
        per_minute=1200,
        max_bytes=512 * 1024,
        raw_body="body",
        headers={"key": "X-Crm-Provider-Key"},
        description="A bounce: an RFC 3464 delivery-status notification as received, or a provider's JSON webhook.",
    ),
    "crm.campaign.v1.TrackingService.PostInboundMail": Public(
        per_minute=1200,
        max_bytes=512 * 1024,
        raw_body="body",
        headers={"key": "X-Crm-Provider-Key"},
        description="A mail to the marketing mailbox as received: a bounce, a reply to a campaign, an auto-reply.",
    ),
    "crm.campaign.v1.TrackingService.PostDeliveryReceipt": Public(
        per_minute=1200,
        max_bytes=16 * 1024,
        headers={"key": "X-Crm-Provider-Key"},
        description="An SMS delivery receipt.",
    ),
    "crm.campaign.v1.TrackingService.PostTrackingEvents": Public(
        per_minute=120, max_bytes=64 * 1024, client_address="client_address", description="The site's click-stream."
    ),
    # Telegram / Bale webhooks: the raw Update, and the secret token setWebhook was given
    "crm.support.v1.ChannelService.PostBotUpdate": Public(
        per_minute=600,
        max_bytes=1024 * 1024,
        raw_body="body",
        headers={"secret_token": "X-Telegram-Bot-Api-Secret-Token"},
        description="A bot's webhook (setWebhook url and secret_token).",
    ),
}


@dataclass(frozen=True)
class Route:
    method: str  # GET, POST, PATCH, DELETE, PUT
    path: str  # OpenAPI form: /v1/customers/{customer_id}
    service: str  # the gRPC service's full name: crm.customer.v1.CustomerService
    rpc: str  # gRPC method name
    summary: str
    # request field <- template over the path parameters: {"name": "customers/{customer_id}"}
    bind: dict[str, str] = field(default_factory=dict)
    body: str | None = None  # "*": the whole request; "customer": that field; None: no body
    status: int = 200
    stream: bool = False  # server-streaming download (exports)
    # bytes field filled by the `file` part when the body is multipart/form-data (the other form
    # fields fill the request fields of their names); JSON bodies work as for any route
    upload: str | None = None
    media_types: tuple[str, ...] = ()  # a download's
    description: str = ""
    public: Public | None = None  # reached without a bearer token (public.py)

    @property
    def endpoint(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def flask_path(self) -> str:
        return self.path.replace("{", "<").replace("}", ">")

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.path)


_VARIABLE = re.compile(r"\{([\w.]+)(?:=([^}]*))?\}")
_PATTERN_VARIABLE = re.compile(r"\{(\w+)\}")
_VERBS = ("get", "put", "post", "delete", "patch")


class RouteError(ValueError):
    """An http annotation this gateway cannot serve (it says which RPC and why)."""


def _resource_patterns(service: descriptor.ServiceDescriptor) -> dict[str, list[str]]:
    """ "customers/*/notes/*" -> ["customer_id", "note_id"], from the resource patterns the
    service's file (and the files it imports) declare, per message or per file."""
    found: dict[str, list[str]] = {}
    seen: set[str] = set()

    def visit(file: descriptor.FileDescriptor) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        patterns = [p for r in file.GetOptions().Extensions[resource_pb2.resource_definition] for p in r.pattern]
        for message in file.message_types_by_name.values():
            patterns.extend(message.GetOptions().Extensions[resource_pb2.resource].pattern)
        for pattern in patterns:
            found.setdefault(_PATTERN_VARIABLE.sub("*", pattern), _PATTERN_VARIABLE.findall(pattern))
        for dep in file.dependencies:
            visit(dep)

    visit(service.file)
    return found


def _wildcard_names(segments: str, fieldpath: str, patterns: dict[str, list[str]]) -> list[str]:
    """Names of the `*` in `segments`: the variables of the resource pattern it is (or that it
    is the parent of: shelves/* of shelves/{shelf_id}/books/{book_id}), else each named after
    the collection before it (tags/* -> tag_id), else the field's own name."""
    if segments in patterns:
        return patterns[segments]
    wildcards = segments.split("/").count("*")
    for glob, names in patterns.items():
        if glob.startswith(segments + "/"):
            return names[:wildcards]
    names, previous = [], None
    for part in segments.split("/"):
        if part == "*":
            base = singular_of(previous).replace(" ", "_") if previous else None
            names.append(f"{base}_id" if base else fieldpath.replace(".", "_"))
        previous = part
    return names


def _http_rules(method: descriptor.MethodDescriptor):
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return []
    rule = options.Extensions[annotations_pb2.http]
    return [rule, *rule.additional_bindings]


def _route(service, method, rule, patterns, docs) -> Route:
    where = f"{method.full_name}: google.api.http"
    kind = rule.WhichOneof("pattern")
    if kind not in _VERBS:
        raise RouteError(f"{where}: {kind or 'no verb'} is not served (get, put, post, delete, patch)")
    template = getattr(rule, kind)
    if rule.response_body:
        raise RouteError(f"{where}: response_body is not supported")
    if method.client_streaming:
        raise RouteError(f"{where}: a client-streaming RPC has no HTTP route here")
    bind: dict[str, str] = {}

    def variable(match: re.Match) -> str:
        fieldpath, segments = match.group(1), match.group(2) or "*"
        if "**" in segments:
            raise RouteError(f"{where}: '**' in {{{fieldpath}={segments}}} is not supported")
        names = iter(_wildcard_names(segments, fieldpath, patterns))
        bound = "/".join(f"{{{next(names)}}}" if part == "*" else part for part in segments.split("/"))
        bind[fieldpath] = bound
        return bound

    path = _VARIABLE.sub(variable, template)
    if not path.startswith("/"):
        raise RouteError(f"{where}: the path {template!r} must start with '/'")
    verb = kind.upper()
    last = path.rsplit("/", 1)[-1]
    status = 201 if verb == "POST" and ":" not in last and not last.startswith("{") else 200
    summary, description = docs.get(method.full_name, ("", ""))
    return Route(
        method=verb,
        path=path,
        service=service.full_name,
        rpc=method.name,
        summary=summary or re.sub(r"(?<!^)(?=[A-Z])", " ", method.name),
        bind=bind,
        body=rule.body or None,
        status=status,
        stream=method.server_streaming,
        upload=UPLOADS.get(method.full_name),
        media_types=(DOWNLOADS.get(method.full_name, OCTET_STREAM) if method.server_streaming else ()),
        description=description,
        public=PUBLIC.get(method.full_name),
    )


@lru_cache(maxsize=1)
def _comments() -> dict[str, tuple[str, str]]:
    """Method full name -> (first sentence, whole comment), from the descriptor set with
    comments that tools/gen_protos.py writes beside the stubs (the stubs carry none)."""
    try:
        raw = resources.files("crm").joinpath("descriptors.binpb").read_bytes()
    except (FileNotFoundError, OSError):
        return {}
    out = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(raw).file:
        for loc in file.source_code_info.location:
            # [6, service, 2, method]: a method of a service
            if len(loc.path) == 4 and loc.path[0] == 6 and loc.path[2] == 2 and loc.leading_comments:
                service = file.service[loc.path[1]]
                name = f"{file.package}.{service.name}.{service.method[loc.path[3]].name}"
                text = " ".join(loc.leading_comments.split())
                first = re.split(r"(?<=\.)\s", text, maxsplit=1)[0].rstrip(".")
                out[name] = (first, text)
    return out


def build_routes(services: dict[str, descriptor.ServiceDescriptor]) -> list[Route]:
    """Every route the annotations of these services declare; RouteError on one it cannot serve
    or on two RPCs claiming the same verb and path."""
    docs = _comments()
    routes: list[Route] = []
    taken: dict[tuple[str, str], str] = {}
    for service in services.values():
        patterns = _resource_patterns(service)
        for method in service.methods:
            for rule in _http_rules(method):
                route = _route(service, method, rule, patterns, docs)
                clash = taken.setdefault((route.method, route.path), method.full_name)
                if clash != method.full_name:
                    raise RouteError(f"{route.method} {route.path}: declared by {clash} and {method.full_name}")
                routes.append(route)
    return routes


ROUTES: list[Route] = build_routes(SERVICES)
